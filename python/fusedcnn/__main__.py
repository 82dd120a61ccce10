"""`python -m fusedcnn ...` is the `fusedcnn` console script."""
import sys

from fusedcnn.cli import main

sys.exit(main())
