"""CPU/GPU speed paths that keep a module's numerics contract: packed and Winograd convolutions, folded upsampling, allocator and host-copy helpers."""
