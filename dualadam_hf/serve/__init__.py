"""Using a fine-tuned model: chat with it (``chat``) and export it for serving tools (``export``).

Both take what a run of ``scripts/finetune.py`` left (its output_dir or one of its checkpoints), or any model
folder or Hub id, and load it the way the run recorded (``trained``).
"""
