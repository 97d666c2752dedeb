"""The `router` python model: the ledger's effects executed against Triton (model), its repository API client,
metrics and memory probe."""
