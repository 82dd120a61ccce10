"""Moved: `fusedcnn compile-check` (python/fusedcnn/compile_check.py; --help). This shim forwards to it."""
import sys
from fusedcnn.compile_check import main
sys.exit(main())
