"""nnsnake: the nnU-Net v2 method as a resumable, cluster-native Snakemake workflow.

The library holds all logic, one module per stage; the Snakemake rules under ``workflow/`` only wire
files together and call these functions.
"""

__version__ = "0.1.0"
