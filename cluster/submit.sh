#!/usr/bin/env bash
# Submit the training job to a running Ray cluster and follow its log until it ends.
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/submit.sh CONFIG [key=value ...]
# RAY_ADDRESS is the cluster's job server (the dashboard address): `ray dashboard
# cluster/ray-cluster.yaml` forwards it to 127.0.0.1:8265; on Kubernetes, port-forward the
# head service's port 8265. The repository is uploaded as the job's working directory
# (.gitignore'd files, .venv and runs/ left out). The workdir must be an s3:// or gs:// URI
# or an absolute path every node mounts: a relative one is refused. Extra `ray job submit` options go in RAY_JOB_SUBMIT_ARGS (e.g. --no-wait).
# Exit status: that of `ray job submit` (0 when the job succeeded).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: RAY_ADDRESS=http://HEAD:8265 $0 CONFIG [key=value ...]" >&2
    exit 2
fi
: "${RAY_ADDRESS:?set RAY_ADDRESS to the job server of the cluster, e.g. http://127.0.0.1:8265}"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

# The runtime env as JSON: what not to upload. This machine's own TFDS_DATA_DIR or KERAS_HOME
# are paths on this machine and are not passed on: the cluster's nodes have their own (or
# set data.data_dir=s3://... on the command line).
runtime_env=$("$PYTHON" -c '
import json, os
env = {k: os.environ[k] for k in ("TF_CPP_MIN_LOG_LEVEL",) if k in os.environ}
print(json.dumps({"env_vars": env, "excludes": [".venv", "runs", ".git", "**/__pycache__"]}))')

# shellcheck disable=SC2086  # RAY_JOB_SUBMIT_ARGS is a list of options
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" \
    ${RAY_JOB_SUBMIT_ARGS:-} -- python -m job train "$@" ray.enabled=true
