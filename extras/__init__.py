"""Optional capabilities, each in a module of its own, imported only when a flag or an input asks
for it. The core (data, unet, train, evaluate, export, predict, common) reads without them."""
