"""Ground floor: atomic and verified files, the process check, progress and cancellation, small results
back from an accelerator, and the helpers that share work over the processes of `accelerate launch`.
Imports nothing else of neurontune."""
