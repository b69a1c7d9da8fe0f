// The Go peer: net/http + pgx (v4, pgxpool), the stack PERF-FINDINGS.md measured as the
// ceiling on this machine. Same SQL as Surge (read from sql/users.sql, so they cannot drift
// apart), same JSON shape as bench/baseline.py, the tenant from the X-Tenant header, a pool of
// --pool connections. Built by bench/run.py from Debian's packages (golang-go and
// golang-github-jackc-pgx-v4-dev) in GOPATH mode: no module download.
//
//	bench-go-peer --port 8205 --pool 16 --sql sql/users.sql
package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgtype"
	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/pgxpool"
)

type user struct {
	ID        string          `json:"id"`
	TenantID  string          `json:"tenant_id"`
	Email     string          `json:"email"`
	Username  string          `json:"username"`
	Status    string          `json:"status"`
	Roles     []string        `json:"roles"`
	Profile   json.RawMessage `json:"profile"`
	Version   int32           `json:"version"`
	CreatedAt string          `json:"created_at"`
	UpdatedAt string          `json:"updated_at"`
}

type page struct {
	Items      []user  `json:"items"`
	NextCursor *string `json:"next_cursor"`
}

type scanner interface {
	Scan(dest ...interface{}) error
}

var (
	pool      *pgxpool.Pool
	getUser   string
	listUsers string
	healthy   = []byte(`{"status":"ok"}`)
)

// loadSQL reads "-- name: x" blocks, as db/queries.py does.
func loadSQL(path string) map[string]string {
	f, err := os.Open(path)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	out := map[string]string{}
	name := ""
	var body []string
	flush := func() {
		if name != "" {
			out[name] = strings.TrimSpace(strings.Join(body, "\n"))
		}
	}
	s := bufio.NewScanner(f)
	for s.Scan() {
		line := s.Text()
		if strings.HasPrefix(line, "-- name:") {
			flush()
			name, body = strings.TrimSpace(line[len("-- name:"):]), nil
		} else if !strings.HasPrefix(strings.TrimSpace(line), "--") {
			body = append(body, line)
		}
	}
	flush()
	return out
}

func uuidText(b [16]byte) string {
	var buf [36]byte
	hex.Encode(buf[0:8], b[0:4])
	buf[8] = '-'
	hex.Encode(buf[9:13], b[4:6])
	buf[13] = '-'
	hex.Encode(buf[14:18], b[6:8])
	buf[18] = '-'
	hex.Encode(buf[19:23], b[8:10])
	buf[23] = '-'
	hex.Encode(buf[24:], b[10:])
	return string(buf[:])
}

func parseUUID(s string) (pgtype.UUID, bool) {
	var u pgtype.UUID
	if len(s) != 36 || u.Set(s) != nil {
		return u, false
	}
	return u, true
}

func stamp(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000Z")
}

func scanUser(row scanner) (user, [16]byte, error) {
	var id, tenant pgtype.UUID
	var profile pgtype.JSONB
	var created, updated time.Time
	var u user
	err := row.Scan(&id, &tenant, &u.Email, &u.Username, &u.Status, &u.Roles, &profile,
		&u.Version, &created, &updated)
	if err != nil {
		return u, id.Bytes, err
	}
	u.ID, u.TenantID = uuidText(id.Bytes), uuidText(tenant.Bytes)
	u.Profile = json.RawMessage(profile.Bytes)
	u.CreatedAt, u.UpdatedAt = stamp(created), stamp(updated)
	return u, id.Bytes, nil
}

func answer(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(body)
}

func fail(w http.ResponseWriter, status int, detail string) {
	body, _ := json.Marshal(map[string]interface{}{"status": status, "detail": detail})
	answer(w, status, body)
}

// tenantOf answers 400 itself when the X-Tenant header is not a tenant id.
func tenantOf(w http.ResponseWriter, r *http.Request) (pgtype.UUID, bool) {
	tenant, ok := parseUUID(r.Header.Get("X-Tenant"))
	if !ok {
		fail(w, 400, "X-Tenant must be a tenant id")
	}
	return tenant, ok
}

func handleHealthz(w http.ResponseWriter, r *http.Request) {
	answer(w, 200, healthy)
}

func handleUser(w http.ResponseWriter, r *http.Request) {
	tenant, ok := tenantOf(w, r)
	if !ok {
		return
	}
	id, ok := parseUUID(strings.TrimPrefix(r.URL.Path, "/v1/users/"))
	if !ok {
		fail(w, 404, "no such user")
		return
	}
	u, _, err := scanUser(pool.QueryRow(r.Context(), getUser, tenant, id))
	if err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			fail(w, 404, "no such user")
		} else {
			fail(w, 500, "database error")
		}
		return
	}
	body, _ := json.Marshal(u)
	answer(w, 200, body)
}

func handleUsers(w http.ResponseWriter, r *http.Request) {
	tenant, ok := tenantOf(w, r)
	if !ok {
		return
	}
	limit := 50
	if raw := r.URL.Query().Get("limit"); raw != "" {
		n, err := strconv.Atoi(raw)
		if err != nil || n < 1 || n > 200 {
			fail(w, 422, "limit must be 1..200")
			return
		}
		limit = n
	}
	// One row past the page tells whether there is a next page without a count query.
	rows, err := pool.Query(r.Context(), listUsers, tenant, nil, nil, nil, limit+1)
	if err != nil {
		fail(w, 500, "database error")
		return
	}
	defer rows.Close()
	p := page{Items: make([]user, 0, limit)}
	var last [16]byte
	n := 0
	for rows.Next() {
		u, id, err := scanUser(rows)
		if err != nil {
			fail(w, 500, "database error")
			return
		}
		n++
		if n <= limit {
			p.Items = append(p.Items, u)
			last = id
		}
	}
	if rows.Err() != nil {
		fail(w, 500, "database error")
		return
	}
	if n > limit {
		cursor := base64.RawURLEncoding.EncodeToString(last[:])
		p.NextCursor = &cursor
	}
	body, _ := json.Marshal(p)
	answer(w, 200, body)
}

func main() {
	port := flag.Int("port", 8205, "port on 127.0.0.1")
	size := flag.Int("pool", 16, "pooled connections")
	sqlPath := flag.String("sql", "sql/users.sql", "Surge's named queries")
	flag.Parse()
	queries := loadSQL(*sqlPath)
	getUser, listUsers = queries["get_user"], queries["list_users"]
	if getUser == "" || listUsers == "" {
		log.Fatal("get_user or list_users missing from ", *sqlPath)
	}
	dsn := os.Getenv("BENCH_DATABASE_URL")
	if dsn == "" {
		dsn = "postgresql://postgres@127.0.0.1:5432/surge_bench"
	}
	config, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		log.Fatal(err)
	}
	config.MaxConns = int32(*size)
	config.MinConns = int32(*size)
	pool, err = pgxpool.ConnectConfig(context.Background(), config)
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", handleHealthz)
	mux.HandleFunc("/v1/users/", handleUser)
	mux.HandleFunc("/v1/users", handleUsers)
	server := &http.Server{Addr: "127.0.0.1:" + strconv.Itoa(*port), Handler: mux}
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		server.Shutdown(ctx)
	}()
	if err := server.ListenAndServe(); err != http.ErrServerClosed {
		log.Fatal(err)
	}
	pool.Close()
}
