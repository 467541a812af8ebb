"""Ground floor: atomic and verified files, the process check, progress and cancellation, and the helpers
that share work over the processes of `accelerate launch`. Imports nothing else of neurontune."""
