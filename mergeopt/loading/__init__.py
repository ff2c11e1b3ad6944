"""Loading: checkpoint headers and tensors, PEFT LoRA adapters, and sharded reads under torchrun.

Everything that turns paths in a recipe into tensors lives here; nothing here merges.
"""
