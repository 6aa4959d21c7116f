"""Rank reallocation, pure torch: the static-shape rank-slot machinery (``rank_ops``) that
ExpertLoRA and AdaLoRA layers share, and the EPnG prune/grow planner (``epng``) and AdaLoRA's budget schedule (``adalora``).

Below the adapters in the layering: nothing here imports ``lightning_peft.adapters``.
"""
