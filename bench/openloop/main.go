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
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type target struct{ path, token string }

type answer struct {
	status     int // 0: no answer (timeout, refused connection)
	ms         float64
	retryAfter bool
}

func readTargets(path string) ([]target, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []target
	scan := bufio.NewScanner(f)
	for scan.Scan() {
		fields := strings.Split(scan.Text(), "\t")
		if len(fields) == 3 {
			out = append(out, target{"/v1/users/" + fields[1], fields[2]})
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

func main() {
	base := flag.String("url", "http://127.0.0.1:8206", "the server")
	targetsPath := flag.String("targets", "", "TSV: tenant, user id, access token")
	rate := flag.Float64("rate", 1000, "requests per second")
	duration := flag.Duration("duration", 10*time.Second, "how long to send")
	conns := flag.Int("conns", 4000, "most connections open at once")
	outstandingMax := flag.Int64("outstanding", 20000, "most requests unanswered at once; beyond it a due request is counted as not sent")
	timeout := flag.Duration("timeout", 10*time.Second, "a request unanswered this long counts as status 0")
	flag.Parse()

	targets, err := readTargets(*targetsPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "openloop:", err)
		os.Exit(2)
	}
	transport := &http.Transport{
		MaxConnsPerHost:     *conns,
		MaxIdleConns:        *conns,
		MaxIdleConnsPerHost: *conns,
		DisableCompression:  true,
	}
	client := &http.Client{Transport: transport, Timeout: *timeout}

	answers := make(chan answer, 1<<16)
	var outstanding int64
	var sent, notSent int
	var wg sync.WaitGroup
	rng := rand.New(rand.NewSource(19))

	one := func(due time.Time, t target) {
		defer wg.Done()
		defer atomic.AddInt64(&outstanding, -1)
		req, _ := http.NewRequest("GET", *base+t.path, nil)
		req.Header.Set("Authorization", "Bearer "+t.token)
		a := answer{}
		if resp, err := client.Do(req); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			a.status = resp.StatusCode
			a.retryAfter = resp.Header.Get("Retry-After") != ""
		}
		a.ms = float64(time.Since(due).Microseconds()) / 1000
		answers <- a
	}

	var collected []answer
	done := make(chan struct{})
	go func() {
		for a := range answers {
			collected = append(collected, a)
		}
		close(done)
	}()

	// Every millisecond, send what has fallen due since: sleeping once per request cannot keep
	// a schedule of 20 µs steps, and the latency is counted from each request's own due time.
	start := time.Now()
	total := int(*rate * duration.Seconds())
	for i := 0; i < total; {
		now := time.Now()
		for ; i < total; i++ {
			due := start.Add(time.Duration(float64(i) / *rate * float64(time.Second)))
			if due.After(now) {
				break
			}
			if atomic.LoadInt64(&outstanding) >= *outstandingMax {
				notSent++
				continue
			}
			atomic.AddInt64(&outstanding, 1)
			wg.Add(1)
			sent++
			go one(due, targets[rng.Intn(len(targets))])
		}
		time.Sleep(time.Millisecond)
	}
	sendingS := time.Since(start).Seconds()
	wg.Wait()
	close(answers)
	<-done

	statuses := map[string]int{}
	var ok, refused, all []float64
	noRetryAfter := 0
	for _, a := range collected {
		statuses[fmt.Sprint(a.status)]++
		all = append(all, a.ms)
		switch a.status {
		case 200:
			ok = append(ok, a.ms)
		case 503:
			refused = append(refused, a.ms)
			if !a.retryAfter {
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
