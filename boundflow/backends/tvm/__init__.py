"""The TVM backend: lower BoundTasks to Relax (lower), compile them for the CPU (pipeline,
schedule) and read their memory use (analysis). Every module here imports TVM, the optional
extra (pip install -e ".[tvm]"); boundflow.runtime.tvm_executor imports them only when used.
"""
