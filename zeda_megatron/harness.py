"""``python -m zeda_megatron.harness --model HF_DIR``: lm-evaluation-harness on an exported model with
the run's routed null share (:mod:`zeda_megatron.eval.harness`)."""

import sys

from zeda_megatron.eval.harness import main

if __name__ == "__main__":
    sys.exit(main())
