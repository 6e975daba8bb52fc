"""DIFF V1 attention: composed (two SDPA calls), naive (materialised) and fused (one kernel)."""
