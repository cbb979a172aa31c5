"""Test-only stand-in for flash_attn: the names OpenRLHF imports at module top, no kernels."""
