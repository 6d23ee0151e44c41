"""`sinkless ...` with the per-image DVT mode moved to the last layer's keys (docs/DENOISE.md, "Which tasks see it").

The per-image mode of `compare --fix dvt` rewrites the final output features; this runs the CLI with Stage 1
fitted to, and written back into, the last layer's keys instead (``DVT_FEATURES=residual`` for the block's
output), to measure what DVT per image does to LOST:

    python scripts/dvt_keys_per_image.py -q compare --model planted-vit --fix none --fix dvt \\
        --task lost --l2 --gram-bias median --data mini [--dvt-output raw-minus-artifact]
"""

import functools
import os
import sys

import sinkless.denoise as denoise
import sinkless.denoise.hook as hook
from sinkless.cli import main

FEATURES = os.environ.get("DVT_FEATURES", "keys")
denoise.Stage1Settings = functools.partial(denoise.Stage1Settings, features=FEATURES)  # what the fix builds its fits with


class _AtFeatures(hook.FeatureTransform):
    def __init__(self, loaded, transform, *, features=FEATURES, layer=-1):
        super().__init__(loaded, transform, features=features, layer=layer)


hook.FeatureTransform = _AtFeatures

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
