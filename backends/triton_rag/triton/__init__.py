"""Code that runs inside Triton's python backend stubs (imports triton_python_backend_utils)."""
