"""Reading and writing images and raw datasets: geometry, NIfTI integrity checks, case discovery, verification."""
