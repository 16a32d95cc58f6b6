"""Data: dataset readers, dlib alignment, the Ray Data prepare pipeline, synthetic faces, loaders."""
