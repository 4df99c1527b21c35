"""device: what the hardware is and has. The GPU's name and torch's CUDA allocator (``info``), memory
readings of the device and the host, freeing cached blocks (``devmem``).

The bottom floor: imports no other cogvid_core package, and every other package may import it.
Card capabilities (which kernels a compute capability has) belong here too.
"""
