"""Feature extraction: frames, videos, optical flow and detections into LMDB feature stores."""
