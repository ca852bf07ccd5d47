"""The TVM backend: lower BoundTasks to Relax (lower), compile them for the CPU (pipeline,
schedule) and read their memory use (analysis). Every module here imports TVM, the optional
extra (pip install -e ".[tvm]"); boundflow.runtime.tvm_executor imports them only when used.
"""
import os

# TVM's thread pool, when it starts, pins the thread that started it (our main thread) to core 0
# unless told not to: torch would then run on one core for the rest of the process, and every
# process that uses TVM would share that core. Set before any TVM code runs (the pool starts
# lazily); a user's own setting wins.
os.environ.setdefault("TVM_BIND_THREADS", "0")
