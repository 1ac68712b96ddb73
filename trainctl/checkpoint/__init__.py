"""Asynchronous sharded checkpoints: committed by a manifest, verified on read, retained by policy.

Modules: `layout` (names), `manifest` (commit marker), `retention` (what to delete) are pure;
`storage` moves bytes (file:// and s3://); `dcp_io` plugs that storage into
torch.distributed.checkpoint; `checkpointer` is what training scripts use; `inspect` is what
the CLI uses.
"""
