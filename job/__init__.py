"""Transfer learning of an ImageNet MobileNetV2 onto TFDS image-classification sets."""

import time

# Wall times are measured from the start of the command (this package's import), not of training.
COMMAND_START = time.time()
