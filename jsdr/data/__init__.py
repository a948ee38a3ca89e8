"""Data: datasets (files and hub), prompt rendering, answer grading and host-side batch building."""
