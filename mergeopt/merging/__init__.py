"""Merging: the expert stack, the merge-aware modules that form each layer's θ(w), the simplex, the methods.

A strategy never knows how the stack is stored; a method never knows where the weights came from.
"""
