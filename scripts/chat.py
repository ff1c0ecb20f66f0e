"""Talk to a fine-tuned model, prompted as its training prompted it, the answer streamed as it is generated.

Usage:
    python scripts/chat.py RUN_DIR [--prompt TEXT ...] [--max_new_tokens N] [--sample [--seed S]] [--device D] [--dtype T]
    python scripts/chat.py outputs/tiny_alpaca --prompt "用一句话介绍长城。"
    python scripts/chat.py outputs/tiny_alpaca          # a conversation: /reset forgets it, /exit or Ctrl-D leaves

RUN_DIR is a run's output_dir (full weights, or a LoRA adapter loaded on the base model the run recorded), one
of its checkpoint-N folders, a model folder or a Hub id. The prompt is the tokenizer's chat template, or the
Alpaca prompt for a run whose tokenizer has none, exactly as training rendered it; answers are greedy unless
--sample.
"""

import sys

from dualadam_hf.serve.chat import main

if __name__ == "__main__":
    sys.exit(main(prog="chat.py", description=__doc__))
