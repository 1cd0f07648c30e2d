"""Training an SAE: the loop (`train`), its configuration (`config`), Adam and the schedules
(`optim`), the L0 controller (`l0control`), checkpoints (`checkpoint`) and the batch prefetcher
(`prefetch`). Imports sae/, data/, io/ and eval/'s metrics; nothing imports it but dist/, eval's
compare and the CLI.
"""
