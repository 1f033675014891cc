import os
import sys

# Tests import the flat project files (model.py, data.py, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
