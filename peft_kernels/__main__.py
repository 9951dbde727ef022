"""python -m peft_kernels info | bench | demo"""
import sys

from peft_kernels.cli import main

sys.exit(main())
