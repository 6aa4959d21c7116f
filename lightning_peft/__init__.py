"""lightning-peft: parameter-efficient fine-tuning for PyTorch Lightning.

Public names are imported lazily so that ``from lightning_peft import LoRA`` does not pay for
importing Lightning, transformers or bitsandbytes.
"""

from lightning_peft.lazy_exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # pure-torch adapters
    "AdapterSpec": "lightning_peft.adapters.base",
    "LoRA": "lightning_peft.adapters.lora",
    "QLoRA": "lightning_peft.adapters.quantized",
    "BitFit": "lightning_peft.adapters.bitfit",
    "FullFineTune": "lightning_peft.adapters.full",
    "ExpertLoRA": "lightning_peft.adapters.experts",
    "AdaLoRA": "lightning_peft.adapters.adalora",
    "HRM": "lightning_peft.adapters.hrm",
    "BaRA": "lightning_peft.adapters.bara",
    "FRAME": "lightning_peft.adapters.frame",
    "NALoRA": "lightning_peft.adapters.nalora",
    "LiteLoRA": "lightning_peft.adapters.litelora",
    # targeting and files
    "apply_adapter": "lightning_peft.targeting",
    "AdapterReport": "lightning_peft.targeting",
    "check_adapter_gradients": "lightning_peft.gradient_check",
    "selection_shift": "lightning_peft.nalora_diagnostic",
    "save_adapter": "lightning_peft.io",
    "load_adapter": "lightning_peft.io",
    "merge_adapter": "lightning_peft.io",
    "unmerge_adapter": "lightning_peft.io",
    "remove_adapter": "lightning_peft.io",
    "register_adapter": "lightning_peft.adapters.registry",
    "AdapterLibrary": "lightning_peft.library",
    # efficiency metrics (pure torch)
    "netscore": "lightning_peft.metrics.netscore",
    "ns_e": "lightning_peft.metrics.netscore",
    "ns_m": "lightning_peft.metrics.netscore",
    "ns_sharp": "lightning_peft.metrics.netscore",
    "count_macs": "lightning_peft.metrics.macs",
    "select_energy_source": "lightning_peft.metrics.energy",
    "ConstantPowerSource": "lightning_peft.metrics.energy",
    "calibrate_hrm": "lightning_peft.hrm_calibration",
    "hrm_dims_for_lora_budget": "lightning_peft.hrm_budget",
    # Lightning integration
    "AdapterCallback": "lightning_peft.callbacks.adapter",
    "AdaptiveCheckpointCallback": "lightning_peft.callbacks.adaptive_checkpoint",
    "ExpertImportanceCallback": "lightning_peft.callbacks.expert_importance",
    "EfficiencyCallback": "lightning_peft.callbacks.efficiency",
    "HRMCalibrationCallback": "lightning_peft.callbacks.hrm",
    "BaRACallback": "lightning_peft.callbacks.bara",
    "NALoRACallback": "lightning_peft.callbacks.nalora",
    "ContinualAdapterCallback": "lightning_peft.callbacks.continual",
    "AdapterFSDP2Strategy": "lightning_peft.strategies",
    "PolicyLibrary": "lightning_peft.rl.library",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
