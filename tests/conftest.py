import os
import sys

# tests import helpers that live beside them (reference_modules) and run from the repo root
sys.path.insert(0, os.path.dirname(__file__))
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
