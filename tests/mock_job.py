"""`python tests/mock_job.py N ARGS...`: the job's CLI on N mock examples per split.

For tests that need a fresh process (logical CPU devices, signals) but no real data.
"""

import sys

import tensorflow_datasets as tfds

from job.__main__ import main

if __name__ == "__main__":
    with tfds.testing.mock_data(num_examples=int(sys.argv[1])):
        sys.exit(main(sys.argv[2:]))
