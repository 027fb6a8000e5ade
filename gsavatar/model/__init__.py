"""Neural building blocks of the avatar: input encodings and the deformation networks."""
