// Command openloop is bench/overload.py's load generator: an open loop, as real clients are.
//
// wrk is a closed loop: each connection sends its next request when the last one is answered,
// so a server that refuses fast is sent more, and one that stalls is sent less (coordinated
// omission). Here the requests leave on a fixed schedule, `rate` per second, whether or not the
// earlier ones have been answered, and each one's latency counts from the moment it was due, so
// a client waiting for a free connection is counted as waiting. Standard library only: built in
// GOPATH mode from Debian's golang-go, no download.
//
//	openloop -url http://127.0.0.1:8206 -targets bench/data/overload-flood.tsv -rate 20000 -duration 15s
//
// Targets: one line per request kind, "tenant<TAB>user id<TAB>access token"; each request is
// GET /v1/users/{user id} with that token, picked at random. Output: one JSON line on stdout.
//
// HTTP/1.1 keep-alive on non-blocking sockets and epoll (Linux), in one goroutine, as wrk does:
// net/http's goroutine per request, or even a goroutine per connection, spends a pinned core in
// Go's scheduler and netpoller, and a read that finds nothing after every write, where this
// spends it in the kernel's TCP (one write and one read per request). A due request goes to an
// idle connection (the most recently used), or waits for one; while requests wait, connections
// are opened, a few at a time, up to -conns. Nothing is allocated per request.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"net"
	"net/url"
	"os"
	"sort"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

const (
	maxDialing = 8 // a burst of connects would take the core from the requests, and snowball
	bufSize    = 4 << 10
	maxHead    = 64 << 10 // a longer status line, header or chunk line is an error
)

type job struct {
	seq, target int32
	retried     bool
}

// result is one scheduled request's fate, written once when it is settled.
type result struct {
	us         uint32 // latency from the due time, µs
	status     int16  // 0: no answer (timeout, refused or broken connection); -1: not sent
	retryAfter bool
}

type phase uint8

const (
	phStatus phase = iota
	phHeader
	phBody       // `left` bytes of body (or of chunk and its CRLF)
	phChunkSize  // a chunk-size line
	phTrailer    // trailer lines up to the empty one
	phUntilClose // a body without length: it ends with the connection
)

type state uint8

const (
	connecting state = iota
	idle
	busy
)

type conn struct {
	fd     int
	state  state
	served int // answers read on it: a request that fails on a reused connection is retried once
	since  time.Time

	job  job
	wbuf []byte // what is left of the request to write
	rbuf []byte
	r, w int  // rbuf[r:w] is read and not yet parsed
	got  bool // any byte of the answer came

	phase      phase
	status     int
	retryAfter bool
	keep       bool
	chunked    bool
	length     int64
	left       int64
}

var errMalformed = errors.New("malformed answer")

type generator struct {
	sa       syscall.Sockaddr
	family   int
	ep       int
	requests [][]byte // per target: the whole request, prebuilt
	start    time.Time
	rate     float64
	timeout  time.Duration
	results  []result

	conns       []*conn // by fd
	idle        []*conn // a stack: the most recently used first
	open        int     // connections open or being opened
	dialing     int
	maxConns    int
	pending     []job // a ring of requests due and waiting for a connection
	head, n     int
	outstanding int
}

func (g *generator) due(seq int32) time.Time {
	return g.start.Add(time.Duration(float64(seq) / g.rate * float64(time.Second)))
}

func (g *generator) settle(j job, status int, retryAfter bool) {
	due := g.due(j.seq)
	us := time.Since(due).Microseconds()
	if us < 0 {
		us = 0
	}
	if us > g.timeout.Microseconds() { // answered, but after the timeout
		status, retryAfter = 0, false
	}
	g.results[j.seq] = result{us: uint32(us), status: int16(status), retryAfter: retryAfter}
	g.outstanding--
}

func (g *generator) push(j job, front bool) {
	if front {
		g.head = (g.head + len(g.pending) - 1) % len(g.pending)
		g.pending[g.head] = j
	} else {
		g.pending[(g.head+g.n)%len(g.pending)] = j
	}
	g.n++
}

func (g *generator) pop() job {
	j := g.pending[g.head]
	g.head = (g.head + 1) % len(g.pending)
	g.n--
	return j
}

// pump hands waiting requests to idle connections and opens connections for the rest.
func (g *generator) pump() {
	for g.n > 0 && len(g.idle) > 0 {
		c := g.idle[len(g.idle)-1]
		g.idle = g.idle[:len(g.idle)-1]
		if c.fd >= 0 && c.state == idle {
			g.send(c, g.pop())
		}
	}
	for g.n > g.dialing && g.open < g.maxConns && g.dialing < maxDialing {
		if err := g.dial(); err != nil {
			g.settle(g.pop(), 0, false) // as net/http tells a request its dial failed
		}
	}
}

func (g *generator) dial() error {
	fd, err := syscall.Socket(g.family, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	if err = syscall.Connect(fd, g.sa); err != nil && err != syscall.EINPROGRESS {
		syscall.Close(fd)
		return err
	}
	// EPOLLOUT until connected, then EPOLLIN only (level-triggered: one read per event).
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLOUT, Fd: int32(fd)}
	if err = syscall.EpollCtl(g.ep, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
		syscall.Close(fd)
		return err
	}
	for fd >= len(g.conns) {
		g.conns = append(g.conns, nil)
	}
	c := g.conns[fd]
	if c == nil {
		c = &conn{rbuf: make([]byte, bufSize)}
		g.conns[fd] = c
	}
	c.fd, c.state, c.served, c.since, c.r, c.w = fd, connecting, 0, time.Now(), 0, 0
	g.open++
	g.dialing++
	return nil
}

func (g *generator) watch(c *conn, out bool) {
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(c.fd)}
	if out {
		ev.Events |= syscall.EPOLLOUT
	}
	syscall.EpollCtl(g.ep, syscall.EPOLL_CTL_MOD, c.fd, &ev)
}

func (g *generator) close(c *conn) {
	if c.state == connecting {
		g.dialing--
	}
	syscall.Close(c.fd) // also takes it out of the epoll set
	c.fd = -1
	g.open--
}

// fail closes c; its request, if it had one, is retried once when the connection was reused and
// nothing of the answer came (the server had closed it), else it counts as no answer.
func (g *generator) fail(c *conn) {
	st := c.state
	g.close(c)
	if st != busy {
		return
	}
	j := c.job
	if c.served > 0 && !c.got && !j.retried && time.Since(g.due(j.seq)) < g.timeout {
		j.retried = true
		g.push(j, true)
		return
	}
	g.settle(j, 0, false)
}

func (g *generator) send(c *conn, j job) {
	if time.Since(g.due(j.seq)) >= g.timeout { // waited out its timeout for a connection
		g.settle(j, 0, false)
		g.idle = append(g.idle, c)
		return
	}
	c.state, c.job, c.got = busy, j, false
	c.phase, c.status = phStatus, 0
	c.wbuf = g.requests[j.target]
	g.write(c)
}

func (g *generator) write(c *conn) {
	for len(c.wbuf) > 0 {
		n, errno := rawWrite(c.fd, c.wbuf)
		if errno == syscall.EAGAIN {
			g.watch(c, true)
			return
		}
		if errno == syscall.EINTR {
			continue
		}
		if errno != 0 {
			g.fail(c)
			return
		}
		c.wbuf = c.wbuf[n:]
	}
}

func (g *generator) event(c *conn, events uint32) {
	switch c.state {
	case connecting:
		if events&(syscall.EPOLLOUT|syscall.EPOLLERR|syscall.EPOLLHUP) == 0 {
			return
		}
		if soErr, err := syscall.GetsockoptInt(c.fd, syscall.SOL_SOCKET, syscall.SO_ERROR); err != nil || soErr != 0 {
			g.close(c)
			if g.n > 0 {
				g.settle(g.pop(), 0, false)
			}
			return
		}
		g.dialing--
		c.state = idle
		g.watch(c, false)
		g.idle = append(g.idle, c)
	case idle: // the server closed it, or spoke out of turn
		g.close(c)
	case busy:
		if events&syscall.EPOLLOUT != 0 && len(c.wbuf) > 0 {
			g.write(c)
			if c.fd < 0 {
				return
			}
			if len(c.wbuf) == 0 {
				g.watch(c, false)
			}
		}
		if events&(syscall.EPOLLIN|syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
			g.read(c)
		}
	}
}

func (g *generator) read(c *conn) {
	if c.r == c.w {
		c.r, c.w = 0, 0
	} else if c.w == len(c.rbuf) {
		if c.r > 0 {
			c.w = copy(c.rbuf, c.rbuf[c.r:c.w])
			c.r = 0
		} else if len(c.rbuf) < maxHead {
			c.rbuf = append(c.rbuf, make([]byte, len(c.rbuf))...)
		} else {
			g.fail(c)
			return
		}
	}
	n, errno := rawRead(c.fd, c.rbuf[c.w:])
	switch {
	case errno == syscall.EAGAIN || errno == syscall.EINTR:
		return
	case errno != 0:
		g.fail(c)
		return
	case n == 0:
		if c.phase == phUntilClose {
			g.answered(c)
		} else {
			g.fail(c)
		}
		return
	}
	c.w += n
	c.got = true
	done, err := c.parse()
	if err != nil {
		g.fail(c)
	} else if done {
		g.answered(c)
	}
}

func (g *generator) answered(c *conn) {
	g.settle(c.job, c.status, c.retryAfter)
	c.served++
	if !c.keep || c.r != c.w { // bytes beyond the answer: it cannot be trusted for the next
		c.state = idle
		g.close(c)
		return
	}
	c.state = idle
	g.idle = append(g.idle, c)
}

// parse reads what is buffered of the answer; done when it is whole.
func (c *conn) parse() (done bool, err error) {
	for {
		buf := c.rbuf[c.r:c.w]
		switch c.phase {
		case phBody:
			take := c.left
			if int64(len(buf)) < take {
				take = int64(len(buf))
			}
			c.r += int(take)
			c.left -= take
			if c.left > 0 {
				return false, nil
			}
			if !c.chunked {
				return true, nil
			}
			c.phase = phChunkSize
			continue
		case phUntilClose:
			c.r = c.w
			return false, nil
		}
		i := bytes.IndexByte(buf, '\n')
		if i < 0 {
			return false, nil
		}
		line := bytes.TrimRight(buf[:i], "\r")
		c.r += i + 1
		switch c.phase {
		case phStatus: // "HTTP/1.1 200 OK"
			if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
				return false, errMalformed
			}
			c.status = 0
			for _, d := range line[9:12] {
				if d < '0' || d > '9' {
					return false, errMalformed
				}
				c.status = c.status*10 + int(d-'0')
			}
			c.keep = line[7] == '1' // HTTP/1.0 closes unless it says keep-alive
			c.retryAfter, c.chunked, c.length = false, false, -1
			c.phase = phHeader
		case phHeader:
			if len(line) > 0 {
				c.header(line)
				continue
			}
			switch {
			case c.status/100 == 1:
				c.phase = phStatus // an interim answer: the real one follows
			case c.status == 204 || c.status == 304:
				return true, nil
			case c.chunked:
				c.phase = phChunkSize
			case c.length >= 0:
				c.phase, c.left = phBody, c.length
			default:
				c.phase, c.keep = phUntilClose, false
			}
		case phChunkSize:
			size, digits := int64(0), 0
		hex:
			for _, d := range line {
				switch {
				case d >= '0' && d <= '9':
					size = size*16 + int64(d-'0')
				case d >= 'a' && d <= 'f':
					size = size*16 + int64(d-'a') + 10
				case d >= 'A' && d <= 'F':
					size = size*16 + int64(d-'A') + 10
				default:
					break hex
				}
				digits++
			}
			if digits == 0 || digits > 15 {
				return false, errMalformed
			}
			if size == 0 {
				c.phase = phTrailer
			} else {
				c.phase, c.left = phBody, size+2
			}
		case phTrailer:
			if len(line) == 0 {
				return true, nil
			}
		}
	}
}

func (c *conn) header(line []byte) {
	colon := bytes.IndexByte(line, ':')
	if colon <= 0 {
		return
	}
	name, value := line[:colon], bytes.TrimSpace(line[colon+1:])
	switch {
	case bytes.EqualFold(name, []byte("Content-Length")):
		c.length = 0
		for _, d := range value {
			if d < '0' || d > '9' {
				c.length, c.keep = -1, false // read to the close: the length is not to be trusted
				return
			}
			c.length = c.length*10 + int64(d-'0')
		}
	case bytes.EqualFold(name, []byte("Transfer-Encoding")):
		c.chunked = containsFold(value, "chunked")
	case bytes.EqualFold(name, []byte("Connection")):
		if containsFold(value, "close") {
			c.keep = false
		} else if containsFold(value, "keep-alive") {
			c.keep = true
		}
	case bytes.EqualFold(name, []byte("Retry-After")):
		c.retryAfter = len(value) > 0
	}
}

// containsFold: whether b holds s (lower case), in any case, without allocating.
func containsFold(b []byte, s string) bool {
	for i := 0; i+len(s) <= len(b); i++ {
		if bytes.EqualFold(b[i:i+len(s)], []byte(s)) {
			return true
		}
	}
	return false
}

// Non-blocking sockets only: RawSyscall skips the scheduler's bookkeeping for a blocking call.
func rawRead(fd int, p []byte) (int, syscall.Errno) {
	n, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	return int(n), e
}

func rawWrite(fd int, p []byte) (int, syscall.Errno) {
	n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	return int(n), e
}

// epollWait waits at most a millisecond, so RawSyscall6 holds up the runtime no longer than that.
func epollWait(ep int, events []syscall.EpollEvent, msec int) int {
	n, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_PWAIT, uintptr(ep),
		uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), uintptr(msec), 0, 0)
	if e != 0 {
		return 0
	}
	return int(n)
}

// expire settles what has waited out the timeout: queued requests and requests on connections,
// and gives up connects as slow.
func (g *generator) expire(now time.Time) {
	for g.n > 0 && now.Sub(g.due(g.pending[g.head].seq)) >= g.timeout {
		g.settle(g.pop(), 0, false)
	}
	for _, c := range g.conns {
		if c == nil || c.fd < 0 {
			continue
		}
		switch {
		case c.state == busy && now.Sub(g.due(c.job.seq)) >= g.timeout:
			j := c.job
			c.state = idle
			g.close(c)
			g.settle(j, 0, false)
		case c.state == connecting && now.Sub(c.since) >= g.timeout:
			g.close(c)
			if g.n > 0 {
				g.settle(g.pop(), 0, false)
			}
		}
	}
}

func readTargets(path, host, prefix string) ([][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out [][]byte
	scan := bufio.NewScanner(f)
	for scan.Scan() {
		fields := strings.Split(scan.Text(), "\t")
		if len(fields) == 3 {
			out = append(out, []byte("GET "+prefix+"/v1/users/"+fields[1]+" HTTP/1.1\r\nHost: "+
				host+"\r\nAuthorization: Bearer "+fields[2]+"\r\n\r\n"))
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no targets in %s", path)
	}
	return out, scan.Err()
}

func percentiles(ms []float64) map[string]float64 {
	if len(ms) == 0 {
		return nil
	}
	sort.Float64s(ms)
	at := func(q float64) float64 { return ms[int(q*float64(len(ms)-1))] }
	return map[string]float64{
		"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p999": at(0.999), "max": ms[len(ms)-1],
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "openloop:", err)
	os.Exit(2)
}

func main() {
	base := flag.String("url", "http://127.0.0.1:8206", "the server")
	targetsPath := flag.String("targets", "", "TSV: tenant, user id, access token")
	rate := flag.Float64("rate", 1000, "requests per second")
	duration := flag.Duration("duration", 10*time.Second, "how long to send")
	conns := flag.Int("conns", 4000, "most connections open at once")
	outstandingMax := flag.Int("outstanding", 20000, "most requests unanswered at once; beyond it a due request is counted as not sent")
	timeout := flag.Duration("timeout", 10*time.Second, "a request unanswered this long counts as status 0")
	flag.Parse()

	u, err := url.Parse(*base)
	if err == nil && u.Scheme != "http" {
		err = fmt.Errorf("only http:// URLs, not %q", *base)
	}
	if err != nil {
		fatal(err)
	}
	port := u.Port()
	if port == "" {
		port = "80"
	}
	addr, err := net.ResolveTCPAddr("tcp", net.JoinHostPort(u.Hostname(), port))
	if err != nil {
		fatal(err)
	}
	requests, err := readTargets(*targetsPath, u.Host, strings.TrimRight(u.Path, "/"))
	if err != nil {
		fatal(err)
	}
	ep, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		fatal(err)
	}
	total := int(*rate * duration.Seconds())
	g := &generator{
		ep:       ep,
		requests: requests,
		rate:     *rate,
		timeout:  *timeout,
		results:  make([]result, total),
		maxConns: *conns,
		pending:  make([]job, *outstandingMax+1),
	}
	if ip4 := addr.IP.To4(); ip4 != nil {
		sa := &syscall.SockaddrInet4{Port: addr.Port}
		copy(sa.Addr[:], ip4)
		g.sa, g.family = sa, syscall.AF_INET
	} else {
		sa := &syscall.SockaddrInet6{Port: addr.Port}
		copy(sa.Addr[:], addr.IP.To16())
		g.sa, g.family = sa, syscall.AF_INET6
	}
	rng := rand.New(rand.NewSource(19))
	sent, notSent := 0, 0
	events := make([]syscall.EpollEvent, 1024)
	var sendingS float64
	lastExpire := time.Now()

	// Each turn: queue what has fallen due, hand it out, wait up to a millisecond for answers.
	// The latency is counted from each request's own due time, not from the turn's.
	g.start = time.Now()
	for i := 0; i < total || g.outstanding > 0; {
		now := time.Now()
		for ; i < total; i++ {
			if g.due(int32(i)).After(now) {
				break
			}
			if g.outstanding >= *outstandingMax {
				g.results[i].status = -1
				notSent++
				continue
			}
			g.outstanding++
			sent++
			g.push(job{seq: int32(i), target: int32(rng.Intn(len(requests)))}, false)
		}
		if i == total && sendingS == 0 {
			sendingS = time.Since(g.start).Seconds()
		}
		if now.Sub(lastExpire) >= 10*time.Millisecond {
			g.expire(now)
			lastExpire = now
		}
		g.pump()
		n := epollWait(ep, events, 1)
		for _, ev := range events[:n] {
			if c := g.conns[ev.Fd]; c != nil && c.fd >= 0 {
				g.event(c, ev.Events)
			}
		}
	}
	for _, c := range g.conns {
		if c != nil && c.fd >= 0 {
			syscall.Close(c.fd)
		}
	}

	statuses := map[string]int{}
	var ok, refused, all []float64
	noRetryAfter := 0
	for _, r := range g.results {
		if r.status < 0 {
			continue
		}
		ms := float64(r.us) / 1000
		statuses[fmt.Sprint(r.status)]++
		all = append(all, ms)
		switch r.status {
		case 200:
			ok = append(ok, ms)
		case 503:
			refused = append(refused, ms)
			if !r.retryAfter {
				noRetryAfter++
			}
		}
	}
	out := map[string]any{
		"rate":           *rate,
		"sending_s":      sendingS,
		"sent":           sent,
		"not_sent":       notSent,
		"statuses":       statuses,
		"no_retry_after": noRetryAfter,
		"latency_ms": map[string]any{
			"ok": percentiles(ok), "refused": percentiles(refused), "all": percentiles(all),
		},
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
