// The Python module `aether._C`. Importing it loads this shared library, whose static
// initialisers (TORCH_LIBRARY in ops.cpp) register the aether:: operators; the module itself
// exposes nothing else, so it needs no pybind11.
#include <Python.h>

static PyModuleDef aether_module = {PyModuleDef_HEAD_INIT, "_C", "AETHER operators (see torch.ops.aether)", -1,
                                    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&aether_module); }
