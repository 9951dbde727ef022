"""python -m peft_kernels info | bench"""
import sys

from peft_kernels.cli import main

sys.exit(main())
