/*
 * The receiver's system calls that must not wait for the GIL.
 *
 * A group commit is write + fdatasync + sendmmsg of its answers. Done from
 * Python, each call gives the GIL up and must take it back before the next,
 * and under load the event loop's thread holds it for up to the switch
 * interval (5 ms) each time, so an answer waits far longer than its fsync.
 * `durable_write` makes the three calls in a row with
 * the GIL released, so the answers leave the instant the fsync returns.
 *
 * Linux only, and optional: where it is not built, engine/ingest/journal.py makes the
 * same calls from Python and the receiver's answerer thread sends the answers.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/* sendmmsg takes at most UIO_MAXIOV messages a call. */
#define SEND_CHUNK 1024

static PyObject *
durable_write(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd, sync, sock_fd;
    Py_buffer data;
    PyObject *answers;
    if (!PyArg_ParseTuple(args, "iy*piO:durable_write", &fd, &data, &sync, &sock_fd, &answers)) {
        return NULL;
    }
    PyObject *items = PySequence_Fast(answers, "answers must be a sequence");
    if (items == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
    struct mmsghdr *headers = NULL;
    struct iovec *iovecs = NULL;
    PyObject **held = NULL;
    PyObject *result = NULL;
    Py_ssize_t filled = 0;
    if (count > 0) {
        headers = PyMem_Calloc((size_t)count, sizeof(*headers));
        iovecs = PyMem_Calloc((size_t)count, sizeof(*iovecs));
        held = PyMem_Calloc((size_t)count, sizeof(*held));
        if (headers == NULL || iovecs == NULL || held == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(items, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "each answer must be (bytes, sockaddr bytes)");
            goto done;
        }
        /* Held while the GIL is released: the caller's list may change meanwhile. */
        Py_INCREF(item);
        held[filled] = item;
        PyObject *answer = PyTuple_GET_ITEM(item, 0);
        PyObject *name = PyTuple_GET_ITEM(item, 1);
        iovecs[filled].iov_base = PyBytes_AS_STRING(answer);
        iovecs[filled].iov_len = (size_t)PyBytes_GET_SIZE(answer);
        headers[filled].msg_hdr.msg_name = PyBytes_AS_STRING(name);
        headers[filled].msg_hdr.msg_namelen = (socklen_t)PyBytes_GET_SIZE(name);
        headers[filled].msg_hdr.msg_iov = &iovecs[filled];
        headers[filled].msg_hdr.msg_iovlen = 1;
        filled++;
    }

    int write_errno = 0, send_errno = 0;
    Py_ssize_t sent = 0;
    Py_BEGIN_ALLOW_THREADS
    const char *at = data.buf;
    size_t left = (size_t)data.len;
    while (left > 0) {
        ssize_t written = write(fd, at, left);
        if (written < 0) {
            if (errno == EINTR) {
                continue;
            }
            write_errno = errno;
            break;
        }
        at += written;
        left -= (size_t)written;
    }
    if (write_errno == 0 && sync) {
        while (fdatasync(fd) != 0) {
            if (errno != EINTR) {
                write_errno = errno;
                break;
            }
        }
    }
    if (write_errno == 0 && sock_fd >= 0) {
        Py_ssize_t done = 0;
        while (done < filled) {
            Py_ssize_t chunk = filled - done;
            if (chunk > SEND_CHUNK) {
                chunk = SEND_CHUNK;
            }
            int got = sendmmsg(sock_fd, headers + done, (unsigned int)chunk, MSG_DONTWAIT);
            if (got <= 0) {
                if (got < 0 && errno == EINTR) {
                    continue;
                }
                /* The message at `done` failed (sender gone, buffer full): skip
                   it; the switch retries and is answered again. */
                send_errno = got < 0 ? errno : EIO;
                done++;
                continue;
            }
            done += got;
            sent += got;
        }
    }
    Py_END_ALLOW_THREADS

    if (write_errno != 0) {
        errno = write_errno;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        result = Py_BuildValue("(ni)", sent, send_errno);
    }

done:
    for (Py_ssize_t i = 0; i < filled; i++) {
        Py_DECREF(held[i]);
    }
    PyMem_Free(headers);
    PyMem_Free(iovecs);
    PyMem_Free(held);
    Py_DECREF(items);
    PyBuffer_Release(&data);
    return result;
}

/* The call_id,serial answer of the usual report, read exactly as
   Vos3000TextCodec.read_key's first branch reads it: two separators present, the
   serial 1..max_serial ASCII digits, the call_id 1..max_call_id printable ASCII
   bytes not starting or ending with a space. Returns 0 for anything else, which
   Python then reads with the full codec; -1 with an exception set. */
static int
usual_key(const char *text, Py_ssize_t size, unsigned char separator, Py_ssize_t max_call_id,
          Py_ssize_t max_serial, PyObject **key, PyObject **answer)
{
    const unsigned char *data = (const unsigned char *)text;
    const unsigned char *end = data + size;
    const unsigned char *first = memchr(data, separator, (size_t)size);
    if (first == NULL) {
        return 0;
    }
    const unsigned char *second = memchr(first + 1, separator, (size_t)(end - first - 1));
    if (second == NULL) {
        return 0;
    }
    Py_ssize_t id_len = first - data, serial_len = second - first - 1;
    if (id_len < 1 || id_len > max_call_id || serial_len < 1 || serial_len > max_serial) {
        return 0;
    }
    if (data[0] == ' ' || data[id_len - 1] == ' ') {
        return 0;
    }
    for (Py_ssize_t i = 0; i < id_len; i++) {
        if (data[i] < 0x20 || data[i] > 0x7e) {
            return 0;
        }
    }
    long long serial = 0;
    for (const unsigned char *at = first + 1; at < second; at++) {
        if (*at < '0' || *at > '9') {
            return 0;
        }
        serial = serial * 10 + (*at - '0');
    }
    PyObject *call_id = PyUnicode_FromStringAndSize(text, id_len);
    PyObject *number = call_id != NULL ? PyLong_FromLongLong(serial) : NULL;
    *key = number != NULL ? PyTuple_Pack(2, call_id, number) : NULL;
    Py_XDECREF(call_id);
    Py_XDECREF(number);
    if (*key == NULL) {
        return -1;
    }
    *answer = PyBytes_FromStringAndSize(text, (const char *)second - text);
    if (*answer == NULL) {
        Py_CLEAR(*key);
        return -1;
    }
    return 1;
}

static PyObject *
read_usual_key(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer data;
    int separator;
    Py_ssize_t max_call_id, max_serial;
    if (!PyArg_ParseTuple(args, "y*inn:read_usual_key", &data, &separator, &max_call_id,
                          &max_serial)) {
        return NULL;
    }
    PyObject *key = NULL, *answer = NULL;
    int usual = usual_key(data.buf, data.len, (unsigned char)separator, max_call_id, max_serial,
                          &key, &answer);
    PyBuffer_Release(&data);
    if (usual < 0) {
        return NULL;
    }
    if (usual == 0) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(NN)", key, answer);
}

static PyObject *
receive(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd, separator;
    unsigned long long headers_address;
    unsigned int slots, name_bytes;
    Py_ssize_t max_call_id, max_serial;
    if (!PyArg_ParseTuple(args, "iKIIinn:receive", &fd, &headers_address, &slots, &name_bytes,
                          &separator, &max_call_id, &max_serial)) {
        return NULL;
    }
    struct mmsghdr *headers = (struct mmsghdr *)(uintptr_t)headers_address;
    int got;
    Py_BEGIN_ALLOW_THREADS
    do {
        got = recvmmsg(fd, headers, slots, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    if (got < 0) {
        int code = errno;
        return Py_BuildValue("([]i)", code == EAGAIN || code == EWOULDBLOCK ? 0 : code);
    }
    PyObject *received = PyList_New(got);
    if (received == NULL) {
        return NULL;
    }
    for (int i = 0; i < got; i++) {
        struct msghdr *message = &headers[i].msg_hdr;
        const char *text = message->msg_iov[0].iov_base;
        Py_ssize_t size = (Py_ssize_t)headers[i].msg_len;
        if ((size_t)size > message->msg_iov[0].iov_len) {
            size = (Py_ssize_t)message->msg_iov[0].iov_len;
        }
        PyObject *key = NULL, *answer = NULL;
        int usual = separator >= 0 ? usual_key(text, size, (unsigned char)separator, max_call_id,
                                               max_serial, &key, &answer)
                                   : 0;
        PyObject *item = usual < 0 ? NULL
                                   : Py_BuildValue("(y#y#NN)", text, size, (const char *)message->msg_name,
                                                   (Py_ssize_t)message->msg_namelen,
                                                   usual ? key : Py_NewRef(Py_None),
                                                   usual ? answer : Py_NewRef(Py_None));
        /* The kernel wrote the sender's address length over the buffer size. */
        message->msg_namelen = name_bytes;
        if (item == NULL) {
            for (int j = i; j < got; j++) {
                headers[j].msg_hdr.msg_namelen = name_bytes;
            }
            Py_DECREF(received);
            return NULL;
        }
        PyList_SET_ITEM(received, i, item);
    }
    return Py_BuildValue("(Ni)", received, 0);
}

/* The common case of Intake.offer for a run of received datagrams, from `start`:
   a sender already known and allowed (peers[addr] is its "host:port"), a key read
   on the way in, not among the stored keys, not waiting for a commit, and room
   for it. Each such report joins the open batch exactly as Intake.offer would
   add it. Stops at the first datagram that is anything else and returns its
   index (len(received) when all were taken); Python decides that one. */
static PyObject *
take_usual(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *received, *peers, *seen, *waiting, *now, *endpoint, *records, *keys, *answers;
    Py_ssize_t start, max_pending;
    if (!PyArg_ParseTuple(args, "O!nO!OO!nOOO!O!O!:take_usual", &PyList_Type, &received, &start,
                          &PyDict_Type, &peers, &seen, &PyDict_Type, &waiting,
                          &max_pending, &now, &endpoint, &PyList_Type, &records, &PyList_Type,
                          &keys, &PyList_Type, &answers)) {
        return NULL;
    }
    Py_ssize_t size = PyList_GET_SIZE(received), at = start;
    for (; at < size; at++) {
        PyObject *item = PyList_GET_ITEM(received, at);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4) {
            break;
        }
        PyObject *data = PyTuple_GET_ITEM(item, 0), *addr = PyTuple_GET_ITEM(item, 1);
        PyObject *key = PyTuple_GET_ITEM(item, 2), *answer = PyTuple_GET_ITEM(item, 3);
        if (key == Py_None || answer == Py_None) {
            break;
        }
        PyObject *source = PyDict_GetItemWithError(peers, addr);
        if (source == NULL) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            break;
        }
        if (!PyUnicode_Check(source) || PyDict_GET_SIZE(waiting) >= max_pending) {
            break;
        }
        /* The stored keys: a set, or engine.ingest._seen's table (its C lookup, no frame). */
        int stored = PySequence_Contains(seen, key);
        if (stored != 0) {
            if (stored < 0) {
                return NULL;
            }
            break;
        }
        int pending = PyDict_Contains(waiting, key);
        if (pending != 0) {
            if (pending < 0) {
                return NULL;
            }
            break;
        }
        PyObject *record = PyTuple_Pack(3, now, source, data);
        PyObject *reply_to = record != NULL ? PyTuple_Pack(2, endpoint, addr) : NULL;
        PyObject *state = reply_to != NULL ? PyList_New(2) : NULL;
        PyObject *reply = state != NULL ? PyTuple_Pack(2, answer, reply_to) : NULL;
        int failed = reply == NULL;
        if (!failed) {
            Py_INCREF(answer);
            PyList_SET_ITEM(state, 0, answer);
            Py_INCREF(reply_to);
            PyList_SET_ITEM(state, 1, reply_to);
            failed = PyList_Append(records, record) < 0 || PyList_Append(keys, key) < 0 ||
                     PyDict_SetItem(waiting, key, state) < 0 || PyList_Append(answers, reply) < 0;
        }
        Py_XDECREF(record);
        Py_XDECREF(reply_to);
        Py_XDECREF(state);
        Py_XDECREF(reply);
        if (failed) {
            return NULL;
        }
    }
    return PyLong_FromSsize_t(at);
}

/* Intake.durable's loop: each key of a durable batch leaves `waiting`; the
   answers owed to copies that came while it was written ([answer, first
   reply-to, further reply-to...]: the further ones) are returned. */
static PyObject *
release_waiting(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *keys, *waiting;
    if (!PyArg_ParseTuple(args, "O!O!:release_waiting", &PyList_Type, &keys, &PyDict_Type,
                          &waiting)) {
        return NULL;
    }
    PyObject *owed = PyList_New(0);
    if (owed == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *state = PyDict_GetItemWithError(waiting, PyList_GET_ITEM(keys, i));
        if (state == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_KeyError, "a durable key was not waiting");
            }
            Py_DECREF(owed);
            return NULL;
        }
        Py_INCREF(state);
        if (PyDict_DelItem(waiting, PyList_GET_ITEM(keys, i)) < 0) {
            Py_DECREF(state);
            Py_DECREF(owed);
            return NULL;
        }
        if (PyList_Check(state) && PyList_GET_SIZE(state) > 2 &&
            PyList_GET_ITEM(state, 0) != Py_None) {
            for (Py_ssize_t j = 2; j < PyList_GET_SIZE(state); j++) {
                PyObject *reply = PyTuple_Pack(2, PyList_GET_ITEM(state, 0), PyList_GET_ITEM(state, j));
                if (reply == NULL || PyList_Append(owed, reply) < 0) {
                    Py_XDECREF(reply);
                    Py_DECREF(state);
                    Py_DECREF(owed);
                    return NULL;
                }
                Py_DECREF(reply);
            }
        }
        Py_DECREF(state);
    }
    return owed;
}

static PyMethodDef methods[] = {
    {"durable_write", durable_write, METH_VARARGS,
     "durable_write(fd, data, sync, sock_fd, answers) -> (sent, send_errno)\n\n"
     "Write all of data to fd, fdatasync it if sync, then send each (answer, sockaddr)\n"
     "on sock_fd (if >= 0) with sendmmsg, all without the GIL. Raises OSError when the\n"
     "write or the sync fails; nothing is sent then. A message that cannot be sent is\n"
     "skipped; send_errno is the last such error (0 if none)."},
    {"receive", receive, METH_VARARGS,
     "receive(fd, headers_address, slots, name_bytes, separator, max_call_id, max_serial)\n"
     "-> (received, errno)\n\n"
     "recvmmsg into the mmsghdr array at headers_address (without the GIL); each datagram\n"
     "as (bytes, raw sockaddr, key, answer), key and answer read as the codec reads the\n"
     "usual report (separator: its byte, or -1 for none), else None. errno: 0, or why\n"
     "the call failed (EAGAIN is 0: nothing was waiting)."},
    {"read_usual_key", read_usual_key, METH_VARARGS,
     "read_usual_key(data, separator, max_call_id, max_serial) -> (key, answer) | None\n\n"
     "The key `receive` reads from one datagram (for tests)."},
    {"take_usual", take_usual, METH_VARARGS,
     "take_usual(received, start, peers, seen, waiting, max_pending, now, endpoint, records,\n"
     "keys, answers) -> index of the first datagram not taken\n\n"
     "Intake.offer's common case over a run of received datagrams (see engine/ingest.py)."},
    {"release_waiting", release_waiting, METH_VARARGS,
     "release_waiting(keys, waiting) -> answers owed to copies (see engine/ingest.py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "engine.ingest._fastio", "System calls of the receiver made without the GIL.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastio(void)
{
    return PyModule_Create(&module);
}
