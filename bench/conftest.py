import os
import sys

# bench files import the shared harness as a top-level module
sys.path.insert(0, os.path.dirname(__file__))
