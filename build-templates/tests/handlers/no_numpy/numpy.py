# Put first on PYTHONPATH to make `import numpy` fail, exercising the worker's no-numpy path.
raise ImportError("numpy is blocked for this test")
