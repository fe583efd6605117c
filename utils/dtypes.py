"""The plain number formats by name: the one table of them that utils/memory.py (bytes of weights
and caches), utils/hf_to_course.py and utils/checkpoints.py (the dtypes the loader reads) share."""

# Bytes of one value in each plain number format.
BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
# Formats that store weights only with scales beside them (quantised checkpoints: see
# utils.hf_to_course.refuse_quantized); models neither compute in them nor load into them.
SCALED_FORMATS = ("float8",)
# The dtypes of unquantised checkpoints, which the loader reads (each one a torch.<name> too).
LOADABLE_DTYPES = tuple(name for name in BYTES_PER_VALUE if name not in SCALED_FORMATS)
