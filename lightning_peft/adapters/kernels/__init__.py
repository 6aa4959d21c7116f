"""Autograd nodes and matmul kernels the adapter layers run on (pure torch): LoRA's fused node
(``lora``), ExpertLoRA's node (``experts``) over grouped matmuls (``grouped``), and the
recomputation of an input from its producer's saved tensors (``recompute``)."""
