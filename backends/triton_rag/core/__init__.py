"""Pure code: no torch, no Triton, no network; runs anywhere (build, launch, inside Triton, tests)."""
