/*
 * The keys (call_id, serial) of stored reports, as the receiver remembers them for
 * the dedup horizon: a compact set of 128-bit fingerprints.
 *
 * A Python set of (str, int) tuples holds about 190 bytes per key (the tuple, the
 * call id, the set's slot), and the receiver keeps an hour of them: at 5,000
 * reports/s that is 18 million keys, over 3 GiB, and a collection of the oldest
 * generation walks every one. Here a key is its SipHash-2-4-128 under a key drawn
 * at random for the process: 16 bytes in an open-addressing table kept at most 60 %
 * full, and 16 more in the first-in first-out ring that says which keys to forget
 * when their batch leaves the horizon. 43 to 85 bytes a key (the table and the ring
 * grow by doubling), no Python object per key, nothing for the collector to walk. Two different keys share a fingerprint
 * with probability about n / 2^128 per insert (n keys held): for a switch sending
 * 10,000 reports/s for a century with an hour's horizon, about 3 in 10^18.
 *
 * Portable C; optional at install (setup.py): without it engine/ingest.py keeps a
 * Python set, with the same behaviour.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t low, high;
} Fingerprint;

/* ---- SipHash-2-4 with a 128-bit output (Aumasson and Bernstein's reference) ---- */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                             \
    do {                                                                                     \
        v0 += v1;                                                                            \
        v1 = ROTL(v1, 13);                                                                   \
        v1 ^= v0;                                                                            \
        v0 = ROTL(v0, 32);                                                                   \
        v2 += v3;                                                                            \
        v3 = ROTL(v3, 16);                                                                   \
        v3 ^= v2;                                                                            \
        v0 += v3;                                                                            \
        v3 = ROTL(v3, 21);                                                                   \
        v3 ^= v0;                                                                            \
        v2 += v1;                                                                            \
        v1 = ROTL(v1, 17);                                                                   \
        v1 ^= v2;                                                                            \
        v2 = ROTL(v2, 32);                                                                   \
    } while (0)

static uint64_t
load_le64(const uint8_t *p)
{
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
           ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) |
           ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

static Fingerprint
siphash128(const uint8_t *in, size_t length, uint64_t k0, uint64_t k1)
{
    uint64_t v0 = UINT64_C(0x736f6d6570736575) ^ k0;
    uint64_t v1 = UINT64_C(0x646f72616e646f6d) ^ k1;
    uint64_t v2 = UINT64_C(0x6c7967656e657261) ^ k0;
    uint64_t v3 = UINT64_C(0x7465646279746573) ^ k1;
    v1 ^= 0xee;
    const uint8_t *end = in + length - (length % 8);
    for (; in != end; in += 8) {
        uint64_t m = load_le64(in);
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t b = ((uint64_t)length) << 56;
    switch (length & 7) {
    case 7:
        b |= ((uint64_t)in[6]) << 48; /* fall through */
    case 6:
        b |= ((uint64_t)in[5]) << 40; /* fall through */
    case 5:
        b |= ((uint64_t)in[4]) << 32; /* fall through */
    case 4:
        b |= ((uint64_t)in[3]) << 24; /* fall through */
    case 3:
        b |= ((uint64_t)in[2]) << 16; /* fall through */
    case 2:
        b |= ((uint64_t)in[1]) << 8; /* fall through */
    case 1:
        b |= ((uint64_t)in[0]);
        break;
    case 0:
        break;
    }
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xee;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    Fingerprint out;
    out.low = v0 ^ v1 ^ v2 ^ v3;
    v1 ^= 0xdd;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    out.high = v0 ^ v1 ^ v2 ^ v3;
    return out;
}

/* ---- the table ---- */

typedef struct {
    PyObject_HEAD
    uint64_t k0, k1;
    /* Open addressing, linear probing, deletion by backward shift (no tombstones).
       An all-zero slot is empty; a key whose fingerprint is zero is stored as 1. */
    Fingerprint *slots;
    size_t capacity; /* a power of two */
    size_t used;
    /* Every key added, oldest first, in a ring: forget_oldest(n) takes n from here. */
    Fingerprint *order;
    size_t order_capacity, order_head, order_length;
} KeyTable;

#define MIN_CAPACITY 1024
/* Grown past 60 % full; shrunk under 1/8 (then half full), so memory follows load. */
#define TOO_FULL(used, capacity) ((used) * 5 >= (capacity) * 3)

static int
is_empty(Fingerprint f)
{
    return f.low == 0 && f.high == 0;
}

/* A key's message: its call id in UTF-8 then its serial as 8 little-endian bytes (the
   message's length, which SipHash mixes in, tells where the call id ends). */
static int
fingerprint_of(KeyTable *self, PyObject *key, Fingerprint *out)
{
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 2 ||
        !PyUnicode_Check(PyTuple_GET_ITEM(key, 0)) || !PyLong_Check(PyTuple_GET_ITEM(key, 1))) {
        PyErr_Format(PyExc_TypeError, "a report key is (call_id: str, serial: int), not %R", key);
        return -1;
    }
    long long serial = PyLong_AsLongLong(PyTuple_GET_ITEM(key, 1));
    if (serial == -1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *call_id = PyTuple_GET_ITEM(key, 0), *encoded = NULL;
    Py_ssize_t size;
    const char *text = PyUnicode_AsUTF8AndSize(call_id, &size);
    if (text == NULL) {
        /* Lone surrogates (a call id decoded with surrogateescape): their UTF-8 bytes
           as surrogatepass writes them, which no other string encodes to. */
        PyErr_Clear();
        encoded = PyUnicode_AsEncodedString(call_id, "utf-8", "surrogatepass");
        if (encoded == NULL) {
            return -1;
        }
        text = PyBytes_AS_STRING(encoded);
        size = PyBytes_GET_SIZE(encoded);
    }
    uint8_t small[256];
    uint8_t *message = (size_t)size + 8 <= sizeof small ? small : PyMem_Malloc((size_t)size + 8);
    if (message == NULL) {
        Py_XDECREF(encoded);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(message, text, (size_t)size);
    uint64_t bits = (uint64_t)serial;
    for (int i = 0; i < 8; i++) {
        message[size + i] = (uint8_t)(bits >> (8 * i));
    }
    *out = siphash128(message, (size_t)size + 8, self->k0, self->k1);
    if (is_empty(*out)) {
        out->low = 1;
    }
    if (message != small) {
        PyMem_Free(message);
    }
    Py_XDECREF(encoded);
    return 0;
}

static size_t
find_slot(const KeyTable *self, Fingerprint f)
{
    size_t mask = self->capacity - 1, at = (size_t)f.low & mask;
    while (!is_empty(self->slots[at]) &&
           !(self->slots[at].low == f.low && self->slots[at].high == f.high)) {
        at = (at + 1) & mask;
    }
    return at;
}

static int
contains(const KeyTable *self, Fingerprint f)
{
    return self->capacity && !is_empty(self->slots[find_slot(self, f)]);
}

static int
rehash(KeyTable *self, size_t capacity)
{
    Fingerprint *slots = PyMem_Calloc(capacity, sizeof(Fingerprint));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Fingerprint *old = self->slots;
    size_t old_capacity = self->capacity;
    self->slots = slots;
    self->capacity = capacity;
    for (size_t i = 0; i < old_capacity; i++) {
        if (!is_empty(old[i])) {
            self->slots[find_slot(self, old[i])] = old[i];
        }
    }
    PyMem_Free(old);
    return 0;
}

/* Room for `more` keys without growing: after this, insert cannot fail. */
static int
reserve(KeyTable *self, size_t more)
{
    size_t capacity = self->capacity ? self->capacity : MIN_CAPACITY;
    while (TOO_FULL(self->used + more, capacity)) {
        capacity *= 2;
    }
    return capacity == self->capacity ? 0 : rehash(self, capacity);
}

static void
insert(KeyTable *self, Fingerprint f)
{
    size_t at = find_slot(self, f);
    if (is_empty(self->slots[at])) {
        self->slots[at] = f;
        self->used++;
    }
}

static void
discard(KeyTable *self, Fingerprint f)
{
    if (self->capacity == 0) {
        return;
    }
    size_t mask = self->capacity - 1, hole = find_slot(self, f);
    if (is_empty(self->slots[hole])) {
        return;
    }
    /* Backward shift: move later members of the run into the hole when their home
       slot does not lie cyclically after the hole, so every lookup still finds them. */
    size_t at = hole;
    for (;;) {
        at = (at + 1) & mask;
        if (is_empty(self->slots[at])) {
            break;
        }
        size_t home = (size_t)self->slots[at].low & mask;
        int stays = hole <= at ? (hole < home && home <= at) : (hole < home || home <= at);
        if (!stays) {
            self->slots[hole] = self->slots[at];
            hole = at;
        }
    }
    self->slots[hole].low = 0;
    self->slots[hole].high = 0;
    self->used--;
}

static int
order_resize(KeyTable *self, size_t capacity)
{
    Fingerprint *order = PyMem_Malloc(capacity * sizeof(Fingerprint));
    if (order == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < self->order_length; i++) {
        order[i] = self->order[(self->order_head + i) % self->order_capacity];
    }
    PyMem_Free(self->order);
    self->order = order;
    self->order_capacity = capacity;
    self->order_head = 0;
    return 0;
}

/* Room in the ring for `more` keys: after this, order_push cannot fail. */
static int
order_reserve(KeyTable *self, size_t more)
{
    size_t capacity = self->order_capacity ? self->order_capacity : MIN_CAPACITY;
    while (capacity < self->order_length + more) {
        capacity *= 2;
    }
    return capacity == self->order_capacity ? 0 : order_resize(self, capacity);
}

static void
order_push(KeyTable *self, Fingerprint f)
{
    self->order[(self->order_head + self->order_length) % self->order_capacity] = f;
    self->order_length++;
}

static void
order_shrink(KeyTable *self)
{
    /* Give memory back after a burst: the ring down to twice what it holds. */
    if (self->order_capacity > MIN_CAPACITY && self->order_length * 4 <= self->order_capacity) {
        if (order_resize(self, self->order_capacity / 2) < 0) {
            PyErr_Clear(); /* keeping the larger ring is fine */
        }
    }
}

static PyObject *
KeyTable_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"key", NULL};
    Py_buffer key;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*:KeyTable", names, &key)) {
        return NULL;
    }
    if (key.len != 16) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "KeyTable needs a 16-byte SipHash key");
        return NULL;
    }
    KeyTable *self = (KeyTable *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->k0 = load_le64((const uint8_t *)key.buf);
        self->k1 = load_le64((const uint8_t *)key.buf + 8);
    }
    PyBuffer_Release(&key);
    return (PyObject *)self;
}

static void
KeyTable_dealloc(KeyTable *self)
{
    PyMem_Free(self->slots);
    PyMem_Free(self->order);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
KeyTable_add_batch(KeyTable *self, PyObject *keys)
{
    PyObject *sequence = PySequence_Fast(keys, "add_batch takes a sequence of keys");
    if (sequence == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    PyObject **items = PySequence_Fast_ITEMS(sequence);
    /* All or nothing: every fingerprint made and room reserved before the first is
       added, so a bad key leaves the table and its order as they were. */
    Fingerprint *fingerprints = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(Fingerprint));
    if (fingerprints == NULL) {
        Py_DECREF(sequence);
        return PyErr_NoMemory();
    }
    int failed = 0;
    for (Py_ssize_t i = 0; i < count && !failed; i++) {
        failed = fingerprint_of(self, items[i], &fingerprints[i]) < 0;
    }
    failed = failed || order_reserve(self, (size_t)count) < 0 || reserve(self, (size_t)count) < 0;
    if (!failed) {
        for (Py_ssize_t i = 0; i < count; i++) {
            order_push(self, fingerprints[i]);
            insert(self, fingerprints[i]);
        }
    }
    PyMem_Free(fingerprints);
    Py_DECREF(sequence);
    return failed ? NULL : PyLong_FromSsize_t(count);
}

static PyObject *
KeyTable_forget_oldest(KeyTable *self, PyObject *arg)
{
    Py_ssize_t count = PyLong_AsSsize_t(arg);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (count < 0 || (size_t)count > self->order_length) {
        PyErr_Format(PyExc_ValueError, "cannot forget %zd keys of %zu added", count,
                     self->order_length);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        discard(self, self->order[self->order_head]);
        self->order_head = (self->order_head + 1) % self->order_capacity;
        self->order_length--;
    }
    order_shrink(self);
    if (self->capacity > MIN_CAPACITY && self->used * 8 < self->capacity) {
        size_t capacity = self->capacity / 2;
        while (capacity > MIN_CAPACITY && self->used * 4 < capacity) {
            capacity /= 2;
        }
        if (rehash(self, capacity) < 0) {
            PyErr_Clear(); /* keeping the larger table is fine */
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
KeyTable_isdisjoint(KeyTable *self, PyObject *keys)
{
    PyObject *iterator = PyObject_GetIter(keys);
    if (iterator == NULL) {
        return NULL;
    }
    PyObject *key;
    while ((key = PyIter_Next(iterator)) != NULL) {
        Fingerprint f;
        int failed = fingerprint_of(self, key, &f) < 0;
        Py_DECREF(key);
        if (failed) {
            Py_DECREF(iterator);
            return NULL;
        }
        if (contains(self, f)) {
            Py_DECREF(iterator);
            Py_RETURN_FALSE;
        }
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *
KeyTable_nbytes(KeyTable *self, void *Py_UNUSED(closure))
{
    size_t bytes = sizeof(KeyTable) + (self->capacity + self->order_capacity) * sizeof(Fingerprint);
    return PyLong_FromSize_t(bytes);
}

static int
KeyTable_contains(KeyTable *self, PyObject *key)
{
    Fingerprint f;
    if (fingerprint_of(self, key, &f) < 0) {
        return -1;
    }
    return contains(self, f);
}

static Py_ssize_t
KeyTable_length(KeyTable *self)
{
    return (Py_ssize_t)self->used;
}

static PyMethodDef KeyTable_methods[] = {
    {"add_batch", (PyCFunction)KeyTable_add_batch, METH_O,
     "add_batch(keys) -> count: remember these keys (newest last)."},
    {"forget_oldest", (PyCFunction)KeyTable_forget_oldest, METH_O,
     "forget_oldest(count): forget the `count` keys added first (as a set's\n"
     "difference_update would: also if added again since)."},
    {"isdisjoint", (PyCFunction)KeyTable_isdisjoint, METH_O,
     "isdisjoint(keys) -> True when none of the keys is remembered."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef KeyTable_getset[] = {
    {"nbytes", (getter)KeyTable_nbytes, NULL, "bytes of memory held", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods KeyTable_as_sequence = {
    .sq_length = (lenfunc)KeyTable_length,
    .sq_contains = (objobjproc)KeyTable_contains,
};

static PyTypeObject KeyTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "engine.ingest._seen.KeyTable",
    .tp_basicsize = sizeof(KeyTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "KeyTable(key: 16 bytes): the (call_id, serial) keys of stored reports, as\n"
              "128-bit SipHash fingerprints, forgotten oldest first.",
    .tp_new = KeyTable_new,
    .tp_dealloc = (destructor)KeyTable_dealloc,
    .tp_methods = KeyTable_methods,
    .tp_getset = KeyTable_getset,
    .tp_as_sequence = &KeyTable_as_sequence,
};

static PyObject *
siphash128_bytes(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer data, key;
    if (!PyArg_ParseTuple(args, "y*y*:siphash128", &data, &key)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (key.len != 16) {
        PyErr_SetString(PyExc_ValueError, "the key is 16 bytes");
    } else {
        Fingerprint f = siphash128((const uint8_t *)data.buf, (size_t)data.len,
                                   load_le64((const uint8_t *)key.buf),
                                   load_le64((const uint8_t *)key.buf + 8));
        uint8_t out[16];
        for (int i = 0; i < 8; i++) {
            out[i] = (uint8_t)(f.low >> (8 * i));
            out[8 + i] = (uint8_t)(f.high >> (8 * i));
        }
        result = PyBytes_FromStringAndSize((const char *)out, 16);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&key);
    return result;
}

static PyMethodDef methods[] = {
    {"siphash128", siphash128_bytes, METH_VARARGS,
     "siphash128(data, key) -> 16 bytes: SipHash-2-4-128 (for tests against the\n"
     "reference vectors)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "engine.ingest._seen", "Compact sets of report keys for dedup.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__seen(void)
{
    if (PyType_Ready(&KeyTableType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&KeyTableType);
    if (PyModule_AddObject(m, "KeyTable", (PyObject *)&KeyTableType) < 0) {
        Py_DECREF(&KeyTableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
