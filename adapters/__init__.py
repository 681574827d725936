"""lpcam_adapters: one package per host codebase; `import lpcam_adapters.<host>` swaps its CAM for LPCAM."""
