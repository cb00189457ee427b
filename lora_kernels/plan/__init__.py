"""Launch plans: what each kernel launch of a benchmark case does on a given GPU, by arithmetic.

Every number here is a **prediction** from the AOT-compiled resources (registers, shared memory)
and a stated roofline model, not a measurement. ``gpus.py`` holds the GPU constants; each backend
adds its own module (``triton.py``, ``cuda.py``). A GPU measurement that disagrees corrects the model.
"""
