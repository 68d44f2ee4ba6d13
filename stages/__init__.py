import gc
import sys

if sys.argv[0] == "-m":  # `python -m stages.<name>` starting: stage_entry collects again once the stage has imported
    gc.disable()
