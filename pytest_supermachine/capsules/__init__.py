"""Failure capsules: the VM of a failed test kept on disk (`capsule`), and rerun or opened (`replay`)."""
