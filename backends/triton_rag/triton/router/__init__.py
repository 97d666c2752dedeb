"""The `router` python model: the shell (model) that carries out core/ledger.py's effects against Triton, on worker
threads where they block (workers), with its repository API client (repository_api), metrics and memory probe."""
