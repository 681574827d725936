"""Minimal patches adding the one `import lpcam_adapters.<host>` line to each host (shipped as package data)."""
