"""Model compression on plain models: magnitude and structured pruning, int8 quantization.

Nothing here is distributed: commands load a checkpoint's full weights into a plain ``GPT`` (see
``dist_llm.interop.init_from``), transform it in one process and write a checkpoint directory
our loaders read (pruning) or an int8 directory with its own loader (quantization).
"""


class CompressError(RuntimeError):
    """Bad input to a compression command; the message names the thing and the fix."""
