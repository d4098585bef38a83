/*
 * Rows of event files as tuples, made from their columns in one C loop.
 *
 * Reading an event file ends with a `CallEvent` (a NamedTuple) per row made of the
 * columns polars has turned into lists. In Python that is
 * `map(partial(tuple.__new__, CallEvent), zip(*columns))`: a zip tuple per row, then
 * `tuple.__new__` for a subclass, which builds a plain tuple and copies it into the
 * subclass's own (three allocations and a Python-level call per row, about half a
 * microsecond: 0.1 s of a 188,000-row file, before replay's detection can start).
 * Here each row is one allocation filled in place, and the values move from the
 * columns into the rows rather than being copied: each column is left holding None.
 * Copied, every value was touched twice more (a reference taken for the row, one
 * dropped when the column was freed), a cache miss each for values made in bulk
 * far apart: freeing a file's columns alone took 0.06 s.
 *
 * Portable C; optional at install (setup.py): without it engine/eventfiles.py does
 * the same with map and zip.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyDoc_STRVAR(take_rows_doc,
             "take_rows(cls, *columns) -> list\n\n"
             "[cls(*row) for row in zip(*columns, strict=True)] for a tuple subclass `cls`\n"
             "whose fields are the columns (lists of equal length), without calling its\n"
             "__new__: the tuples are made directly, as tuple.__new__(cls, row) makes them.\n"
             "The values move into the rows: every column is left holding None (after an\n"
             "error, those already moved).");

static PyObject *
take_rows(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || !PyType_Check(args[0]) ||
        !PyType_IsSubtype((PyTypeObject *)args[0], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "take_rows: the first argument must be a tuple subclass");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[0];
    Py_ssize_t width = nargs - 1;
    Py_ssize_t rows = 0;
    for (Py_ssize_t column = 0; column < width; column++) {
        PyObject *values = args[column + 1];
        if (!PyList_CheckExact(values)) {
            PyErr_Format(PyExc_TypeError, "take_rows: column %zd is not a list", column);
            return NULL;
        }
        for (Py_ssize_t other = 0; other < column; other++) {
            if (args[other + 1] == values) {
                /* Its values would move out the first time, None be found the second. */
                PyErr_Format(PyExc_ValueError, "take_rows: column %zd is column %zd again",
                             column, other);
                return NULL;
            }
        }
        if (column == 0) {
            rows = PyList_GET_SIZE(values);
        }
        else if (PyList_GET_SIZE(values) != rows) {
            PyErr_Format(PyExc_ValueError, "take_rows: column %zd has %zd values, column 0 has %zd",
                         column, PyList_GET_SIZE(values), rows);
            return NULL;
        }
    }
    PyObject *result = PyList_New(rows);
    if (result == NULL) {
        return NULL;
    }
    for (Py_ssize_t row = 0; row < rows; row++) {
        /* tp_alloc of a tuple subclass: zeroed slots, tracked by the collector (which
           skips the slots still empty if an allocation below collects). */
        PyObject *item = cls->tp_alloc(cls, width);
        if (item == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        for (Py_ssize_t column = 0; column < width; column++) {
            /* An allocation may collect, and a finalizer run Python code: a column
               that shrank meanwhile is an error, not a read past its end. */
            PyObject *values = args[column + 1];
            if (PyList_GET_SIZE(values) <= row) {
                Py_DECREF(item);
                Py_DECREF(result);
                PyErr_Format(PyExc_RuntimeError, "take_rows: column %zd changed size", column);
                return NULL;
            }
            /* The column's reference moves to the row; None takes its place. */
            PyObject *value = PyList_GET_ITEM(values, row);
            PyList_SET_ITEM(values, row, Py_NewRef(Py_None));
            PyTuple_SET_ITEM(item, column, value);
        }
        PyList_SET_ITEM(result, row, item);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"take_rows", (PyCFunction)(void (*)(void))take_rows, METH_FASTCALL, take_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "engine.ingest._rows",
    "Rows of event files as tuples, made from their columns in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__rows(void)
{
    return PyModule_Create(&module);
}
