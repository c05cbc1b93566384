"""The machine line every benchmark prints first: CPU model, its vector flags and cores."""
from train import cpu_info


def cpu_line():
    c = cpu_info()
    return f"{c['model']} ({' '.join(c['flags']) or 'no avx2'}), {c['cores']} cores"
